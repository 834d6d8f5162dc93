// Line charts as inline SVG built with DOM calls (no library, no markup strings).
import { svg } from "./dom.js";

const W = 720, H = 200, PAD = { left: 44, right: 70, top: 10, bottom: 24 };

function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

const clock = (t) => new Date(t * 1000).toISOString().slice(11, 19);

// series: [{points: [[t, y]...], class}], lines: [{y, label, class}], t in seconds.
export function lineChart({ title, series, lines = [], yMin, yMax, tMin, tMax, now, yFmt = String }) {
  const x = scale(tMin, tMax, PAD.left, W - PAD.right);
  const y = scale(yMin, yMax, H - PAD.bottom, PAD.top);
  const parts = [svg("title", { text: title })];
  for (const frac of [0, 0.5, 1]) {
    const v = yMin + frac * (yMax - yMin);
    parts.push(svg("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    parts.push(svg("text", { x: 4, y: y(v) + 4, text: yFmt(v) }));
  }
  parts.push(svg("line", { class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom }));
  parts.push(svg("text", { x: PAD.left, y: H - 6, text: clock(tMin) }));
  parts.push(svg("text", { x: W - PAD.right - 50, y: H - 6, text: clock(tMax) }));
  for (const line of lines) {
    if (typeof line.y !== "number" || line.y < yMin || line.y > yMax) continue;
    parts.push(svg("line", { class: line.class, x1: PAD.left, x2: W - PAD.right, y1: y(line.y), y2: y(line.y) }));
    parts.push(svg("text", { x: W - PAD.right + 4, y: y(line.y) + 4, text: line.label }));
  }
  if (now !== undefined) {
    parts.push(svg("line", { class: "now", x1: x(now), x2: x(now), y1: PAD.top, y2: H - PAD.bottom }));
  }
  for (const s of series) {
    if (!s.points.length) continue;
    const points = s.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    parts.push(svg("polyline", { class: s.class, points }));
  }
  return svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title }, parts);
}
