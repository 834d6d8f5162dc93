// One flag, live: state, weight over time with the schedule ahead, the guard, traffic per
// variant, shadows, and (for operators) the rollout actions with a required reason.
import { call, get, metricsText } from "./api.js";
import { lineChart } from "./charts.js";
import { el, replace, table } from "./dom.js";
import { interval, num, percent, perSecond, relative, seconds, span } from "./format.js";
import { variantStats } from "./metrics.js";
import { guardWords, shadowWords, STATE_WORDS } from "./words.js";

const POLL_MS = 2000;
const ACTIONS = [
  ["pause", "Pause", ""], ["resume", "Resume", ""], ["promote", "Promote", ""],
  ["rollback", "Roll back", "danger"], ["restart", "Restart", ""],
];

// The weights still to come, as [t, weight] points from now (seconds since the epoch).
export function scheduleAhead(schedule, status, now) {
  if (!schedule || status.state !== "running" || !status.canary) return [];
  const points = [[now, status.weight]];
  if (schedule.kind === "exponential") {
    const p0 = schedule.p0 ?? 0.01, rate = perSecond(schedule.rate ?? "0.1/h");
    if (!rate) return points;
    const full = Math.log(1 / p0) / rate;  // running time at which the weight reaches 1
    const from = status.running_s || 0;
    for (let i = 1; i <= 24 && from < full; i++) {
      const t = from + ((full - from) * i) / 24;
      points.push([now + t - from, Math.min(1, p0 * Math.exp(rate * t))]);
    }
    const end = points[points.length - 1][0];
    points.push([end + (seconds(schedule.hold_at_full ?? "10m") || 0), 1]);
    return points;
  }
  const steps = schedule.steps || [];
  const next = status.next_change_at ? Date.parse(status.next_change_at) / 1000 : null;
  if (next === null || status.step === null || status.step === undefined) return points;
  let t = Math.max(next, now);
  points.push([t, status.weight]);
  for (const step of steps.slice(status.step + 1)) {
    points.push([t, step.weight]);
    t += seconds(step.hold) || 0;
    points.push([t, step.weight]);
  }
  return points;
}

function weightChart(history, ahead, now) {
  const times = [...history, ...ahead].map(([t]) => t);
  return lineChart({
    title: "canary weight: measured (solid) and scheduled (dashed)",
    series: [{ points: history, class: "past" }, { points: ahead, class: "ahead" }],
    yMin: 0, yMax: 1, tMin: Math.min(...times, now - 60), tMax: Math.max(...times, now + 60),
    now, yFmt: (v) => percent(v, 0),
  });
}

function llrChart(history, guard, now) {
  const values = [guard.A, guard.B, ...history.map(([, v]) => v)].filter(Number.isFinite);
  const pad = 0.1 * (Math.max(...values) - Math.min(...values) || 1);
  return lineChart({
    title: "guard log-likelihood ratio against its bounds A (roll back) and B (healthy)",
    series: [{ points: history, class: "llr" }],
    lines: [{ y: guard.A, label: `A ${num(guard.A, 2)}`, class: "bound-a" },
            { y: guard.B, label: `B ${num(guard.B, 2)}`, class: "bound-b" }],
    yMin: Math.min(...values) - pad, yMax: Math.max(...values) + pad,
    tMin: Math.min(now - 60, ...history.map(([t]) => t)), tMax: now, now, yFmt: (v) => num(v, 2),
  });
}

function card(label, value, id) {
  return el("div", { class: "card", "data-field": id },
    el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function trafficTable(status, rates, stats) {
  const rows = Object.entries(status.traffic || {}).map(([variant, count]) => {
    const s = stats[variant] || {};
    const ms = (x) => (typeof x === "number" ? `${num(x * 1000, 1)} ms` : "-");
    return [variant, String(count), rates[variant] === undefined ? "-" : num(rates[variant], 1),
      percent(s.errorRate ?? null, 2), ms(s.p50), ms(s.p99)];
  });
  return table(["variant", "requests", "req/s", "error rate", "p50", "p99"], rows);
}

function shadowTable(shadows) {
  if (!shadows.length) return el("p", { class: "muted" }, "No shadows.");
  const rows = shadows.map((s) => [
    s.shadow, s.metric, String(s.n ?? 0), num(s.mean_diff), interval(s.ci95),
    interval(s.cs95), num(s.p), s.p_always_valid === undefined ? "-" : num(s.p_always_valid),
    el("span", { class: "words" }, shadowWords(s)),
  ]);
  return table(["shadow", "metric", "pairs", "mean diff", "95 % CI", "95 % CS", "p",
    "always-valid p", "verdict"], rows);
}

function actionsPanel(key, onDone) {
  const reason = el("input", { type: "text", class: "reason", id: "action-reason",
    placeholder: "reason (required, recorded in the audit)", maxlength: 500 });
  const result = el("span", { id: "action-result" });
  const buttons = ACTIONS.map(([action, label, cls]) => el("button", {
    type: "button", class: cls, "data-action": action, disabled: true,
    onclick: async () => {
      result.className = "";
      replace(result, `${label}...`);
      try {
        await call("POST", `/admin/flags/${encodeURIComponent(key)}/${action}`,
          { json: { reason: reason.value.trim() } });
        result.className = "ok";
        replace(result, `${label}: done`);
        reason.value = "";
        buttons.forEach((b) => { b.disabled = true; });
        onDone();
      } catch (err) {
        result.className = "error";
        replace(result, `${label} refused (${err.status ?? "network"}): ${err.message}`);
      }
    },
  }, label));
  reason.addEventListener("input", () => {
    buttons.forEach((b) => { b.disabled = !reason.value.trim(); });
  });
  return el("section", { class: "panel", id: "actions" }, el("h2", {}, "Actions"),
    el("div", { class: "actions" }, reason, buttons), result);
}

export function flagView(root, key, who) {
  const history = [], llrs = [];
  let flagDoc = null, last = null, timer = null, stopped = false;
  const live = el("div", { id: "live" });
  const actions = who.role === "operator" ? actionsPanel(key, () => refresh()) : null;
  const base = `#/flag/${encodeURIComponent(key)}`;
  replace(root,
    el("h1", {}, "Flag ", el("span", { id: "flag-key" }, key)),
    el("p", {}, el("a", { href: `${base}/edit` }, who.role === "operator" ? "edit" : "view document"),
      " · ", el("a", { href: `#/audit?flag=${encodeURIComponent(key)}` }, "audit")),
    live, actions);

  async function refresh() {
    try {
      if (!flagDoc) flagDoc = (await get(`/admin/flags/${encodeURIComponent(key)}`)).document;
      const [status, text] = await Promise.all([
        get(`/admin/flags/${encodeURIComponent(key)}/status`), metricsText().catch(() => ""),
      ]);
      if (stopped) return;
      if (status.version !== undefined && last && status.version !== last.status.version) {
        flagDoc = (await get(`/admin/flags/${encodeURIComponent(key)}`)).document;
      }
      render(status, variantStats(text, key));
    } catch (err) {
      replace(live, el("p", { class: "error" }, `cannot load ${key}: ${err.message}`));
    }
  }

  function render(status, stats) {
    const now = Date.now() / 1000;
    history.push([now, status.weight]);
    if (status.guard) llrs.push([now, status.guard.llr]);
    const rates = {};
    if (last) {
      const dt = now - last.now;
      for (const [v, c] of Object.entries(status.traffic || {})) {
        rates[v] = Math.max(0, c - (last.status.traffic?.[v] ?? 0)) / dt;
      }
    }
    last = { now, status };
    const step = status.step === null || status.step === undefined ? "-"
      : `${status.step + 1} of ${status.steps}`;
    replace(live,
      el("p", { class: "status-line" }, "State: ",
        el("strong", { id: "flag-state", class: `state-${status.state}` },
          STATE_WORDS[status.state] || status.state),
        status.reason ? ` (${status.reason})` : "", ` · version ${status.version ?? "-"}`,
        ` · stable ${status.stable}`, status.canary ? ` · canary ${status.canary}` : ""),
      el("div", { class: "cards" },
        card("canary weight", percent(status.weight, 2), "weight"),
        card("step", step, "step"),
        card("next change", relative(status.next_change_at), "next-change"),
        card("running for", span(status.running_s || 0), "running")),
      el("section", { class: "panel" }, el("h2", {}, "Canary weight"),
        weightChart(history, scheduleAhead(flagDoc?.schedule, status, now), now)),
      el("section", { class: "panel", id: "guard" }, el("h2", {}, "Guard"),
        el("p", { class: "words", id: "guard-words" }, guardWords(status.guard, status.state)),
        status.guard ? el("p", { class: "muted" },
          `llr ${num(status.guard.llr)} · A ${num(status.guard.A)} · B ${num(status.guard.B)}` +
          ` · e0 ${percent(status.guard.e0)} · e1 ${percent(status.guard.e1)}` +
          ` · decision ${status.guard.decision}`) : null,
        status.guard ? llrChart(llrs, status.guard, now) : null),
      el("section", { class: "panel" }, el("h2", {}, "Traffic per variant"),
        trafficTable(status, rates, stats)),
      el("section", { class: "panel", id: "shadows" }, el("h2", {}, "Shadows"),
        shadowTable(status.shadows || [])));
  }

  const loop = async () => {
    await refresh();
    if (!stopped) timer = setTimeout(loop, POLL_MS);
  };
  loop();
  return () => { stopped = true; clearTimeout(timer); };
}
