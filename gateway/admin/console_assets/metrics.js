// Per-variant error rate and latency quantiles of one flag from the Prometheus text on /metrics
// (cumulative since the gateway started).

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function samples(text, name, flag) {
  const out = [];
  for (const line of text.split("\n")) {
    const match = LINE.exec(line);
    if (!match || match[1] !== name) continue;
    const labels = Object.fromEntries([...match[2].matchAll(LABEL)].map((m) => [m[1], m[2]]));
    if (labels.flag === flag) out.push({ labels, value: Number(match[3]) });
  }
  return out;
}

function quantile(buckets, q) {
  const total = buckets.length ? buckets[buckets.length - 1].count : 0;
  if (!total) return null;
  let prevLe = 0, prevCount = 0;
  for (const { le, count } of buckets) {
    if (count >= q * total) {
      if (!Number.isFinite(le)) return prevLe;
      const inside = count - prevCount;
      return inside ? prevLe + ((q * total - prevCount) / inside) * (le - prevLe) : le;
    }
    prevLe = le; prevCount = count;
  }
  return prevLe;
}

export function variantStats(text, flag) {
  const stats = {};
  const of = (v) => (stats[v] ||= { requests: 0, errors: 0, buckets: [] });
  for (const { labels, value } of samples(text, "gateway_requests_total", flag)) {
    const row = of(labels.variant);
    row.requests += value;
    if (Number(labels.code) >= 500) row.errors += value;
  }
  for (const { labels, value } of samples(text, "gateway_request_duration_seconds_bucket", flag)) {
    const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
    of(labels.variant).buckets.push({ le, count: value });
  }
  for (const row of Object.values(stats)) {
    row.buckets.sort((a, b) => a.le - b.le);
    row.errorRate = row.requests ? row.errors / row.requests : null;
    row.p50 = quantile(row.buckets, 0.5);
    row.p99 = quantile(row.buckets, 0.99);
  }
  return stats;
}
