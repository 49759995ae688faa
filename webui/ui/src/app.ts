// The application shell: restores or opens a session, draws the header with the tabs the
// caller's role may use, routes paths to pages (history API; the server answers index.html
// for every non-API path), and shows notices.

import { ApiError, api, message, onUnauthorized, setCsrf } from "./api";
import { fill, h } from "./dom";
import { ROLE_NAMES } from "./format";
import { POLL_MS, type Page, type PageContext } from "./page";
import { accountPage } from "./pages/account";
import { auditPage } from "./pages/audit";
import { libraryPage } from "./pages/library";
import { networksPage } from "./pages/networks";
import { loginPage } from "./pages/login";
import { serversPage } from "./pages/servers";
import { summaryPage } from "./pages/summary";
import { usersPage } from "./pages/users";
import { vmsPage } from "./pages/vms";
import type { Role, Session, User } from "./types";

interface Route {
  path: string;
  title: string;
  page: Page;
  roles: Role[];
  /** Shown as a tab. */
  tab: boolean;
}

const ALL: Role[] = ["manager", "power_user", "regular"];

const ROUTES: Route[] = [
  { path: "/summary", title: "Summary", page: summaryPage, roles: ALL, tab: true },
  { path: "/servers", title: "VM Servers", page: serversPage, roles: ["manager"], tab: true },
  { path: "/vms", title: "Virtual Machines", page: vmsPage, roles: ALL, tab: true },
  { path: "/library", title: "Library Mgmt", page: libraryPage, roles: ["manager"], tab: true },
  { path: "/networks", title: "Networks", page: networksPage, roles: ["manager"], tab: true },
  { path: "/users", title: "Users", page: usersPage, roles: ["manager", "power_user"], tab: true },
  { path: "/audit", title: "Audit", page: auditPage, roles: ["manager"], tab: true },
  { path: "/account", title: "Your account", page: accountPage, roles: ALL, tab: false },
  // The console's noVNC and xterm.js load only when a console is opened.
  { path: "/console", title: "Console", page: (ctx) => void import("./pages/console").then((m) => m.consolePage(ctx)), roles: ALL, tab: false },
];

/** One shown page: its pollers stop when it is left. */
class Shown implements PageContext {
  private timers = new Set<number>();
  private leaving: (() => void)[] = [];
  private dead = false;

  constructor(
    private app: App,
    readonly me: User,
    readonly main: HTMLElement,
  ) {}

  notify(kind: "error" | "info", text: string): void {
    if (!this.dead) this.app.notify(kind, text);
  }

  navigate(path: string): void {
    this.app.navigate(path);
  }

  poll(load: () => Promise<void>): () => void {
    let timer = 0;
    let running = false;
    let again = false;
    const run = async (): Promise<void> => {
      if (this.dead) return;
      if (running) {
        again = true;
        return;
      }
      window.clearTimeout(timer);
      this.timers.delete(timer);
      running = true;
      // A hidden browser tab asks nothing; it catches up when shown again.
      if (!document.hidden) {
        try {
          await load();
          if (!this.dead) this.app.pollError(null);
        } catch (e) {
          if (!this.dead && !(e instanceof ApiError && e.status === 401)) this.app.pollError(message(e));
        }
      }
      running = false;
      if (this.dead) return;
      if (again) {
        again = false;
        void run();
        return;
      }
      timer = window.setTimeout(() => void run(), POLL_MS);
      this.timers.add(timer);
    };
    void run();
    return () => void run();
  }

  onLeave(f: () => void): void {
    if (this.dead) f();
    else this.leaving.push(f);
  }

  stop(): void {
    this.dead = true;
    for (const t of this.timers) window.clearTimeout(t);
    this.timers.clear();
    for (const f of this.leaving.splice(0)) f();
  }
}

export class App {
  private me: User | null = null;
  /** The page asked for before logging in. */
  private wanted: string | null = null;
  private shown: Shown | null = null;
  private header = h("header", { class: "top", "data-test": "header" });
  private notices = h("div", { class: "notices", "data-test": "notices", "aria-live": "polite" });
  private pollNotice = h("div", { class: "notice error hidden", role: "alert", "data-test": "poll-error" });
  private main = h("main", { class: "page", "data-test": "page" });

  constructor(private root: HTMLElement) {}

  async start(): Promise<void> {
    fill(this.root, this.header, h("div", { class: "wrap" }, this.pollNotice, this.notices, this.main));
    window.addEventListener("popstate", () => this.render());
    onUnauthorized((e) => {
      if (this.me) this.loggedOut(`Your session ended (${e.message}): log in again.`);
    });
    try {
      const s = await api<Session>("GET", "/session");
      this.loggedIn(s, false);
    } catch (e) {
      this.me = null;
      if (!(e instanceof ApiError && e.status === 401)) this.notify("error", message(e));
      this.render();
    }
  }

  /** A session opened (login) or restored (page load). */
  loggedIn(s: Session, fresh: boolean): void {
    setCsrf(s.csrf_token);
    this.me = s.user;
    if (fresh) {
      const want = this.wanted;
      this.wanted = null;
      this.navigate(want ?? "/summary", true);
    } else {
      this.render();
    }
  }

  private loggedOut(why: string | null): void {
    this.me = null;
    setCsrf("");
    this.clearNotices();
    if (why) this.notify("error", why);
    this.render();
  }

  navigate(path: string, replace = false): void {
    if (path !== location.pathname) {
      if (replace) history.replaceState(null, "", path);
      else history.pushState(null, "", path);
    }
    this.clearNotices();
    this.render();
  }

  notify(kind: "error" | "info", text: string): void {
    const close = h("button", { class: "close", title: "dismiss", "aria-label": "dismiss" }, "×");
    const n = h(
      "div",
      { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status", "data-test": kind },
      h("span", { class: "text" }, text),
      close,
    );
    close.addEventListener("click", () => n.remove());
    this.notices.appendChild(n);
    if (kind === "info") window.setTimeout(() => n.remove(), 6000);
  }

  /** The poller's trouble, shown once and cleared when a refresh works again. */
  pollError(text: string | null): void {
    if (text === null) {
      this.pollNotice.classList.add("hidden");
      return;
    }
    fill(this.pollNotice, `Could not refresh this page: ${text}`);
    this.pollNotice.classList.remove("hidden");
  }

  private clearNotices(): void {
    fill(this.notices);
    this.pollError(null);
  }

  private render(): void {
    this.shown?.stop();
    this.shown = null;
    fill(this.main);
    const me = this.me;
    if (!me) {
      this.header.classList.add("hidden");
      if (location.pathname !== "/login") {
        // Back there once logged in.
        if (location.pathname !== "/") this.wanted = location.pathname;
        history.replaceState(null, "", "/login");
      }
      document.title = "EnSpeed: log in";
      loginPage(this.main, (s) => {
        this.clearNotices();
        this.loggedIn(s, true);
      });
      return;
    }
    const routes = ROUTES.filter((r) => r.roles.includes(me.role));
    let route = routes.find((r) => r.path === location.pathname);
    if (!route) {
      route = routes[0];
      history.replaceState(null, "", route.path);
    }
    this.drawHeader(me, routes, route);
    document.title = `EnSpeed: ${route.title}`;
    this.main.dataset.page = route.path.slice(1);
    this.shown = new Shown(this, me, this.main);
    route.page(this.shown);
  }

  private link(path: string, attrs: Record<string, string>, ...text: string[]): HTMLAnchorElement {
    const a = h("a", { href: path, ...attrs }, ...text);
    a.addEventListener("click", (ev) => {
      if (ev.button !== 0 || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
      ev.preventDefault();
      this.navigate(path);
    });
    return a;
  }

  private drawHeader(me: User, routes: Route[], current: Route): void {
    this.header.classList.remove("hidden");
    const tabs = routes
      .filter((r) => r.tab)
      .map((r) =>
        this.link(
          r.path,
          {
            class: r === current ? "tab active" : "tab",
            "data-test": `tab-${r.path.slice(1)}`,
            ...(r === current ? { "aria-current": "page" } : {}),
          },
          r.title,
        ),
      );
    const logout = h("button", { class: "logout", "data-test": "logout" }, `logout (${me.name})`);
    logout.addEventListener("click", async () => {
      try {
        await api("DELETE", "/session");
      } catch (e) {
        // The session may be gone already; the user is logged out either way.
        if (!(e instanceof ApiError && e.status === 401)) {
          this.notify("error", `Logging out: ${message(e)}`);
          return;
        }
      }
      this.loggedOut(null);
    });
    fill(
      this.header,
      h(
        "div",
        { class: "bar" },
        h("div", { class: "brand", "data-test": "brand" }, "EnSpeed", h("span", { class: "sub" }, "VM Orchestrator")),
        h("nav", { class: "tabs", "data-test": "tabs" }, tabs),
        h(
          "div",
          { class: "who" },
          this.link(
            "/account",
            {
              class: current.path === "/account" ? "account active" : "account",
              "data-test": "account",
              title: "your account and password",
            },
            `${me.name} · ${ROLE_NAMES[me.role]}`,
          ),
          logout,
        ),
      ),
    );
  }
}
