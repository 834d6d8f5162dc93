// The statistics in plain words, beside the figures. Fields added to the status document
// later (guard test and alpha_spent, shadow verdict, p_always_valid, cs95) are used when
// present; without them the sentence is built from the fields every version has.
import { interval, num, percent } from "./format.js";

export function guardWords(guard, state) {
  if (!guard) return "No guard: this flag has no canary under test.";
  const { n = 0, k = 0, llr = 0, A, B, e0, e1 } = guard;
  const seen = `${n} canary request(s), ${k} error(s)` + (n ? ` (${percent(k / n)})` : "");
  const test = guard.test !== undefined ? ` Test ${guard.test}.` : "";
  const spent = guard.alpha_spent !== undefined && guard.alpha !== undefined
    ? ` False-rollback budget used: ${num(guard.alpha_spent, 5)} of ${num(guard.alpha, 5)}.` : "";
  let verdict;
  if (guard.decision === "reject" || state === "rolled_back") {
    verdict = `Rolled back: the evidence says the canary's error rate is nearer ${percent(e1)} ` +
      `than ${percent(e0)} (llr ${num(llr)} reached A = ${num(A)}).`;
  } else if (guard.decision === "accept") {
    verdict = `Healthy so far: the evidence says the error rate is at most about ${percent(e0)} ` +
      `(llr ${num(llr)} reached B = ${num(B)}); a new test starts for the next stretch.`;
  } else {
    const toA = typeof A === "number" ? num(A - llr) : "-";
    verdict = `Watching: not enough evidence either way yet. A rollback needs the llr to rise ` +
      `${toA} more (to A = ${num(A)}); healthy is declared at B = ${num(B)}.`;
  }
  return `${verdict} ${seen}.${test}${spent}`;
}

export function shadowWords(row) {
  if (row.verdict) return String(row.verdict);
  const n = row.n || 0;
  if (!Array.isArray(row.ci95)) return `Not enough pairs yet (${n}).`;
  const [lo, hi] = row.ci95;
  if (lo > 0) return `Shadow higher by about ${num(row.mean_diff)} (95 % CI ${interval(row.ci95)}, ${n} pairs).`;
  if (hi < 0) return `Shadow lower by about ${num(-row.mean_diff)} (95 % CI ${interval(row.ci95)}, ${n} pairs).`;
  return `No difference detected: the 95 % CI ${interval(row.ci95)} includes 0 (${n} pairs).`;
}

export function shortShadow(row) {
  if (row.verdict) return `${row.shadow}: ${row.verdict}`;
  const words = shadowWords(row);
  return `${row.shadow}: ${words.split(/[:(]/)[0].trim()}`;
}

export const STATE_WORDS = {
  running: "running", paused: "paused", rolled_back: "rolled back", promoted: "promoted",
};
