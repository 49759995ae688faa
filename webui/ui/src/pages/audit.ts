// Audit (Managers): who changed what, newest first. The first load asks for the newest
// entries; each refresh then reads forward from the last entry seen, only what is new.

import { api } from "../api";
import { fill, h } from "../dom";
import { time } from "../format";
import type { PageContext } from "../page";
import type { AuditEntry } from "../types";

/** Entries asked for at once (the API's most). */
const PAGE = 1000;
/** Entries kept and shown. */
const SHOWN = 500;

export function auditPage(ctx: PageContext): void {
  let entries: AuditEntry[] = [];
  let after = 0;
  let first = true;
  const note = h("p", { class: "lead", "data-test": "audit-note" });
  const table = h("div");
  fill(ctx.main, h("h1", null, "Audit"), note, table);

  ctx.poll(async () => {
    let added = 0;
    if (first) {
      entries = await api<AuditEntry[]>("GET", `/audit?newest=${SHOWN}`);
      if (entries.length > 0) after = entries[entries.length - 1].seq;
      added = entries.length;
      first = false;
    }
    for (;;) {
      const page = await api<AuditEntry[]>("GET", `/audit?after=${after}&limit=${PAGE}`);
      if (page.length > 0) after = page[page.length - 1].seq;
      entries = entries.concat(page).slice(-SHOWN);
      added += page.length;
      if (page.length < PAGE) break;
    }
    if (added === 0 && table.firstChild) return;
    fill(note, entries.length < SHOWN ? `${entries.length} changes, newest first.` : `The newest ${SHOWN} changes of ${after}, newest first.`);
    fill(
      table,
      h(
        "table",
        { class: "grid", "data-test": "audit-table" },
        h("thead", null, h("tr", null, ["#", "When", "Who", "Action", "On what"].map((t) => h("th", null, t)))),
        h(
          "tbody",
          null,
          entries
            .slice()
            .reverse()
            .map((e) =>
              h(
                "tr",
                { "data-test": "audit-row", "data-seq": e.seq },
                h("td", { class: "num" }, String(e.seq)),
                h("td", { class: "nowrap" }, time(e.at_ms)),
                h("td", null, e.actor === 0 ? h("span", { class: "muted" }, "the cluster") : e.actor_name),
                h("td", { class: "mono" }, e.action),
                h("td", null, e.target),
              ),
            ),
        ),
      ),
    );
  });
}
