// The audit browser: newest first, filtered by flag (the API) and actor (here), with diffs.
import { get } from "./api.js";
import { el, replace, table } from "./dom.js";

const LIMIT = 500;

export function diffList(changes) {
  const shown = (v) => JSON.stringify(v);
  return el("ul", { class: "diff" }, (changes || []).map((c) => {
    const text = c.op === "added" ? `+ ${c.path}: ${shown(c.after)}`
      : c.op === "removed" ? `- ${c.path}: ${shown(c.before)}`
      : `~ ${c.path}: ${shown(c.before)} → ${shown(c.after)}`;
    return el("li", { class: c.op }, text);
  }));
}

export function auditView(root, params) {
  const flag = el("input", { type: "text", id: "audit-flag", placeholder: "flag", value: params.get("flag") || "" });
  const actor = el("input", { type: "text", id: "audit-actor", placeholder: "actor", value: params.get("actor") || "" });
  const body = el("div", { id: "audit-events" });
  const form = el("form", { class: "inline", onsubmit: (e) => {
    e.preventDefault();
    const query = new URLSearchParams();
    if (flag.value.trim()) query.set("flag", flag.value.trim());
    if (actor.value.trim()) query.set("actor", actor.value.trim());
    location.hash = `#/audit?${query}`;
  } }, flag, actor, el("button", { type: "submit" }, "filter"));
  replace(root, el("h1", {}, "Audit"), form, body);

  (async () => {
    const query = new URLSearchParams({ limit: String(LIMIT) });
    if (params.get("flag")) query.set("flag", params.get("flag"));
    try {
      const { events } = await get(`/admin/audit?${query}`);
      const who = params.get("actor");
      const shown = who ? events.filter((e) => e.actor === who) : events;
      const rows = shown.map((e) => [e.time, e.actor, e.action, e.flag ?? "-",
        `v${e.version_before ?? "-"} → v${e.version_after ?? "-"}`,
        el("span", { class: "reason" }, e.reason || ""), diffList(e.diff)]);
      replace(body, rows.length
        ? table(["when", "actor", "action", "flag", "versions", "reason", "diff"], rows)
        : el("p", { class: "muted" }, "No events match."));
    } catch (err) {
      replace(body, el("p", { class: "error" }, `cannot read the audit: ${err.message}`));
    }
  })();
  return () => {};
}
