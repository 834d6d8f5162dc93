// The admin API, called with the token from sessionStorage as a bearer header. The token is
// never put in a URL or a cookie; requests carry no credentials of the browser's own.

const TOKEN_KEY = "gateway.admin.token";

export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  save: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export async function call(method, path, { json, text, type, headers } = {}) {
  const sent = { Accept: "application/json", ...(headers || {}) };
  const token = session.token();
  if (token) sent.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    body = JSON.stringify(json);
    sent["Content-Type"] = "application/json";
  } else if (text !== undefined) {
    body = text;
    sent["Content-Type"] = type;
  }
  const response = await fetch(path, {
    method, headers: sent, body, credentials: "omit", cache: "no-store", redirect: "error",
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return { data, etag: response.headers.get("ETag"), status: response.status };
}

export const get = async (path) => (await call("GET", path)).data;

// /readyz and /metrics are the admin port's open endpoints (no token needed).
export async function ready() {
  const response = await fetch("/readyz", { credentials: "omit", cache: "no-store" });
  return response.json().catch(() => ({}));
}

export async function metricsText() {
  const response = await fetch("/metrics", { credentials: "omit", cache: "no-store" });
  return response.ok ? response.text() : "";
}
