// Small render helpers: build elements with attributes, listeners and children.

export type Child = Node | string | number | null | undefined | false | Child[];
type Listener = (ev: Event) => void;
export type Attrs = Record<string, string | number | boolean | null | undefined | Listener>;

/** `<tag attrs>children</tag>`: `on*` attributes are listeners, `false`/`null` ones absent. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs | null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (typeof v === "function") {
      el.addEventListener(k.slice(2).toLowerCase(), v);
    } else if (k === "value" && "value" in el) {
      (el as HTMLInputElement).value = String(v);
    } else if (k === "checked" && el instanceof HTMLInputElement) {
      el.checked = Boolean(v);
    } else {
      el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el: Node, children: Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces `el`'s children. */
export function fill(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, children);
}

/** A labelled form field around `input`. */
export function field(label: string, input: HTMLElement, hint?: string): HTMLLabelElement {
  return h("label", { class: "field" }, h("span", { class: "label" }, label), input, hint ? h("small", null, hint) : null);
}

/** A form's named control's value, trimmed. */
export function value(form: HTMLFormElement, name: string): string {
  const el = form.elements.namedItem(name);
  return el && "value" in el ? String(el.value).trim() : "";
}

/** Shows `text` in the error box `box`. */
export function showError(box: HTMLElement, text: string): void {
  fill(box, text);
  box.classList.remove("hidden");
}

/**
 * Runs `action` on each submit of `form`, with the error box `box` hidden and `button`
 * disabled while it runs; if it throws, the box shows what `failure` makes of the error.
 */
export function onSubmit(
  form: HTMLFormElement,
  button: HTMLButtonElement,
  box: HTMLElement,
  action: () => Promise<void>,
  failure: (e: unknown) => string,
): void {
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    box.classList.add("hidden");
    button.disabled = true;
    try {
      await action();
    } catch (e) {
      showError(box, failure(e));
    } finally {
      button.disabled = false;
    }
  });
}
