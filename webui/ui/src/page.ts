// What a page gets from the app: the caller, its container, notices, and a poller that runs
// while the page is shown and stops when the user leaves it.

import type { User } from "./types";

/** How often a shown page refreshes its lists. */
export const POLL_MS = 2000;

export interface PageContext {
  /** The logged-in user. */
  readonly me: User;
  /** The page's container. */
  readonly main: HTMLElement;
  /** Tells the user something: an error stays until dismissed, info fades. */
  notify(kind: "error" | "info", text: string): void;
  /** Runs `load` now and every POLL_MS while the page is shown; the answer refreshes it now. */
  poll(load: () => Promise<void>): () => void;
  /** Goes to another page of the app. */
  navigate(path: string): void;
  /** Runs `f` when the user leaves the page (closes its consoles' sockets). */
  onLeave(f: () => void): void;
}

/** A page: renders into `ctx.main` and keeps itself current with `ctx.poll`. */
export type Page = (ctx: PageContext) => void;
