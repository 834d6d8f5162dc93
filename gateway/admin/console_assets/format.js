// Numbers, times and durations as an operator reads them.

const UNITS = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 };

// "1h30m", "500ms", 90 (seconds) -> seconds; null when unreadable.
export function seconds(value) {
  if (typeof value === "number") return value;
  if (typeof value !== "string") return null;
  const parts = [...value.trim().matchAll(/([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)/g)];
  if (!parts.length) return null;
  return parts.reduce((sum, [, n, unit]) => sum + Number(n) * UNITS[unit], 0);
}

// "0.1/h" or a number (per second) -> per second.
export function perSecond(value) {
  if (typeof value === "number") return value;
  const match = /^\s*([0-9.eE+-]+)\s*\/\s*(ms|s|m|h|d)\s*$/.exec(String(value));
  return match ? Number(match[1]) / UNITS[match[2]] : null;
}

export function span(totalSeconds) {
  let s = Math.max(0, Math.round(totalSeconds));
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (d) return `${d}d${h}h`;
  if (h) return `${h}h${m}m`;
  if (m) return `${m}m${s}s`;
  return `${s}s`;
}

// "in 4m12s" / "3m ago" relative to now; "-" for nothing.
export function relative(iso, now = Date.now()) {
  if (!iso) return "-";
  const delta = (Date.parse(iso) - now) / 1000;
  if (Number.isNaN(delta)) return String(iso);
  return delta >= 0 ? `in ${span(delta)}` : `${span(-delta)} ago`;
}

export const percent = (x, digits = 1) =>
  (typeof x === "number" && Number.isFinite(x) ? `${(x * 100).toFixed(digits)} %` : "-");

export function num(x, digits = 3) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "-";
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e6)) return x.toExponential(2);
  return String(Number(x.toFixed(digits)));
}

export const interval = (pair) =>
  (Array.isArray(pair) && pair.length === 2 ? `[${num(pair[0])}, ${num(pair[1])}]` : "-");
