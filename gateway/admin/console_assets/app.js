// The console's shell: log-in, the header, the stale-store banner and hash routing.
import { ApiError, get, ready, session } from "./api.js";
import { auditView } from "./audit.js";
import { el, replace } from "./dom.js";
import { editorView } from "./editor.js";
import { flagView } from "./flag.js";
import { listView } from "./list.js";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
let stop = () => {};
let who = null;
let bannerTimer = null;

function loginView(message) {
  const token = el("input", { type: "password", id: "token", autocomplete: "off", required: true });
  const problem = el("p", { class: "error", id: "login-error" }, message || "");
  replace(main, el("form", { class: "login", id: "login", onsubmit: async (e) => {
    e.preventDefault();
    session.save(token.value.trim());
    await start();
  } }, el("h1", {}, "Log in"),
  el("label", { for: "token" }, "Admin token (kept in this tab only)"), token,
  el("button", { type: "submit", class: "primary" }, "Log in"), problem));
  token.focus();
}

async function checkStore() {
  try {
    const r = await ready();
    const stale = r.store_up === false || r.stale === true || r.store_stale === true;
    banner.hidden = !stale;
    replace(banner, stale ? "The flag store is unreachable: this gateway serves its last snapshot, " +
      "and what you see may be stale. Writes are refused until the store is back." : "");
  } catch {
    banner.hidden = false;
    replace(banner, "The gateway does not answer: figures below may be stale.");
  }
}

function route() {
  stop();
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  if (parts[0] === "flag" && parts[1] && parts[2] === "edit") stop = editorView(main, parts[1], who);
  else if (parts[0] === "flag" && parts[1]) stop = flagView(main, parts[1], who);
  else if (parts[0] === "audit") stop = auditView(main, params);
  else stop = listView(main);
}

async function start() {
  if (!session.token()) return loginView();
  try {
    who = await get("/admin/whoami");
  } catch (err) {
    session.clear();
    return loginView(err instanceof ApiError ? `Refused (${err.status}): ${err.message}` : `Cannot reach the admin API: ${err.message}`);
  }
  document.getElementById("nav").hidden = false;
  replace(document.getElementById("who"), `${who.name} (${who.role})`);
  document.body.dataset.role = who.role;
  await checkStore();
  clearInterval(bannerTimer);
  bannerTimer = setInterval(checkStore, 5000);
  route();
}

document.getElementById("logout").addEventListener("click", () => {
  session.clear();
  stop();
  clearInterval(bannerTimer);
  who = null;
  document.getElementById("nav").hidden = true;
  loginView("Logged out.");
});
window.addEventListener("hashchange", () => { if (who) route(); });
start();
