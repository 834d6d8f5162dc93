// The flag editor: YAML or JSON, validated through the API as the operator types, with the diff
// a save would make; saves with If-Match, and a 409 shows what the other writer changed.
import { ApiError, call, get } from "./api.js";
import { diffList } from "./audit.js";
import { el, replace } from "./dom.js";

const TYPES = { yaml: "application/yaml", json: "application/json" };
const DEBOUNCE_MS = 300;

export function editorView(root, key, who) {
  const path = `/admin/flags/${encodeURIComponent(key)}`;
  const operator = who.role === "operator";
  let base = null, checked = null, seq = 0, timer = null;
  const format = el("select", { id: "editor-format" },
    el("option", { value: "yaml" }, "YAML"), el("option", { value: "json" }, "JSON"));
  const text = el("textarea", { class: "editor", id: "editor-text", spellcheck: "false",
    readonly: !operator, "aria-label": "flag document" });
  const verdict = el("div", { id: "editor-verdict" });
  const changes = el("div", { id: "editor-diff" });
  const reason = el("input", { type: "text", class: "reason", id: "editor-reason",
    placeholder: "reason (recorded in the audit)", maxlength: 500 });
  const save = el("button", { type: "button", class: "primary", id: "editor-save", disabled: true }, "Save");
  const result = el("div", { id: "editor-result" });
  replace(root,
    el("h1", {}, "Edit ", el("a", { href: `#/flag/${encodeURIComponent(key)}` }, key),
      el("span", { class: "muted", id: "editor-version" }, "")),
    el("div", { class: "actions" }, "format ", format),
    text, verdict, changes,
    operator ? el("div", { class: "actions" }, reason, save) : el("p", { class: "muted" }, "Viewers can read, not save."),
    result);

  function showVersion() {
    replace(root.querySelector("#editor-version"), base ? ` (version ${base.version})` : " (new flag)");
  }

  async function load() {
    try {
      base = await get(path);
    } catch (err) {
      if (err.status !== 404) throw err;
      base = null;
    }
    showVersion();
    const doc = base ? base.document : { key, route: { path_prefix: `/${key}` }, stable: { name: "v1", upstream: "http://127.0.0.1:9001" } };
    if (format.value === "json") text.value = JSON.stringify(doc, null, 2);
    else text.value = (await call("POST", `${path}/validate`, { json: doc })).data.yaml || JSON.stringify(doc, null, 2);
    await validate();
  }

  async function validate() {
    const mine = ++seq;
    let answer;
    try {
      answer = (await call("POST", `${path}/validate`, { text: text.value, type: TYPES[format.value] })).data;
    } catch (err) {
      if (mine === seq) replace(verdict, el("p", { class: "error" }, `cannot validate: ${err.message}`));
      return;
    }
    if (mine !== seq) return;  // an older answer: the text changed since
    checked = answer.valid ? answer : null;
    if (answer.valid) {
      const n = answer.diff.length;
      replace(verdict, el("p", { class: "ok", id: "editor-valid" },
        n ? `valid: ${n} change(s) to save` : "valid: no changes"));
      replace(changes, n ? diffList(answer.diff) : "", answer.consequence
        ? el("p", { id: "editor-consequence" }, `on save: ${typeof answer.consequence === "string" ? answer.consequence : JSON.stringify(answer.consequence)}`) : "");
    } else {
      replace(verdict, el("p", { class: "error" }, `${answer.errors.length} problem(s):`),
        el("ul", { class: "problems", id: "editor-errors" },
          answer.errors.map((e) => el("li", {}, `${e.path}: ${e.message}`))));
      replace(changes);
    }
    save.disabled = !checked || !checked.diff.length;
  }

  async function conflict() {
    const current = await get(path).catch(() => null);
    const { events } = await get(`/admin/audit?flag=${encodeURIComponent(key)}&limit=50`);
    const theirs = events.filter((e) => typeof e.version_after === "number" && e.version_after > (base ? base.version : 0));
    const rebase = el("button", { type: "button", id: "editor-rebase", onclick: async () => {
      base = current;
      showVersion();
      replace(result);
      await validate();
    } }, current ? `keep my text, compare with version ${current.version}` : "keep my text");
    replace(result, el("div", { class: "panel error", id: "editor-conflict" },
      el("p", {}, `Conflict: someone saved this flag after you opened it` +
        (current ? ` (now version ${current.version}).` : " (it was deleted).")),
      theirs.map((e) => el("div", {},
        el("p", {}, `${e.time} ${e.actor} ${e.action} v${e.version_before ?? "-"} → v${e.version_after ?? "-"}`,
          e.reason ? ` (reason: ${e.reason})` : ""),
        diffList(e.diff))),
      rebase));
  }

  save.addEventListener("click", async () => {
    if (!checked) return;
    save.disabled = true;
    const headers = reason.value.trim() ? { "X-Gateway-Reason": reason.value.trim() } : {};
    if (base) headers["If-Match"] = `"${base.version}"`;
    try {
      const { data } = await call("PUT", path, { json: checked.document, headers });
      base = data;
      showVersion();
      replace(result, el("p", { class: "ok", id: "editor-saved" }, `saved: version ${data.version}`));
      await validate();
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) await conflict();
      else if (err instanceof ApiError && err.status === 422) {
        replace(result, el("ul", { class: "problems error" },
          (err.body.errors || []).map((e) => el("li", {}, `${e.path}: ${e.message}`))));
      } else replace(result, el("p", { class: "error" }, `not saved (${err.status ?? "network"}): ${err.message}`));
      save.disabled = false;
    }
  });
  text.addEventListener("input", () => {
    clearTimeout(timer);
    save.disabled = true;
    timer = setTimeout(validate, DEBOUNCE_MS);
  });
  format.addEventListener("change", async () => {
    if (checked) {
      text.value = format.value === "json" ? JSON.stringify(checked.document, null, 2) : checked.yaml;
    }
    await validate();
  });
  load().catch((err) => replace(result, el("p", { class: "error" }, `cannot load ${key}: ${err.message}`)));
  return () => clearTimeout(timer);
}
