// Every flag with its state, weight, step, guard and shadow verdicts.
import { get } from "./api.js";
import { el, replace, table } from "./dom.js";
import { num, percent, relative } from "./format.js";
import { shortShadow, STATE_WORDS } from "./words.js";

const POLL_MS = 5000;

function row(flag, status) {
  const key = flag.key;
  const link = el("a", { href: `#/flag/${encodeURIComponent(key)}`, "data-flag": key }, key);
  if (!status) return [link, el("span", { class: "muted" }, "no status on this replica"), "-", "-", "-", "-", "-"];
  const guard = status.guard
    ? `${status.guard.decision} (llr ${num(status.guard.llr, 2)}, ${status.guard.n} req)` : "-";
  const step = status.step === null || status.step === undefined ? "-" : `${status.step + 1}/${status.steps}`;
  const shadows = (status.shadows || []).map(shortShadow).join("; ") || "-";
  return [link, el("span", { class: `state-${status.state}` }, STATE_WORDS[status.state] || status.state),
    percent(status.weight, 2), step, guard, shadows, relative(status.next_change_at)];
}

export function listView(root) {
  let timer = null, stopped = false;
  const body = el("div", {});
  replace(root, el("h1", {}, "Flags"), body);

  async function refresh() {
    try {
      const { flags } = await get("/admin/flags");
      const statuses = await Promise.all(flags.map((f) =>
        get(`/admin/flags/${encodeURIComponent(f.key)}/status`).catch(() => null)));
      if (stopped) return;
      replace(body, flags.length
        ? table(["flag", "state", "weight", "step", "guard", "shadows", "next change"],
          flags.map((f, i) => row(f, statuses[i])))
        : el("p", { class: "muted" }, "No flags yet."));
    } catch (err) {
      replace(body, el("p", { class: "error" }, `cannot list flags: ${err.message}`));
    }
  }
  const loop = async () => {
    await refresh();
    if (!stopped) timer = setTimeout(loop, POLL_MS);
  };
  loop();
  return () => { stopped = true; clearTimeout(timer); };
}
