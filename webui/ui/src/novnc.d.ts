// The parts of noVNC's RFB client (@novnc/novnc, plain JavaScript) that the console page uses.

declare module "@novnc/novnc" {
  export interface RfbOptions {
    shared?: boolean;
    wsProtocols?: string[];
  }

  export default class RFB extends EventTarget {
    constructor(target: HTMLElement, urlOrChannel: string | WebSocket, options?: RfbOptions);
    scaleViewport: boolean;
    resizeSession: boolean;
    viewOnly: boolean;
    focusOnClick: boolean;
    disconnect(): void;
    sendCtrlAltDel(): void;
    sendKey(keysym: number, code: string | null, down?: boolean): void;
    focus(): void;
    addEventListener(type: "connect", listener: (e: CustomEvent<Record<string, never>>) => void): void;
    addEventListener(type: "disconnect", listener: (e: CustomEvent<{ clean: boolean }>) => void): void;
    addEventListener(type: "securityfailure", listener: (e: CustomEvent<{ status: number; reason?: string }>) => void): void;
    addEventListener(type: "desktopname", listener: (e: CustomEvent<{ name: string }>) => void): void;
  }
}

// Stylesheets imported for their side effect: Vite bundles them into the page's CSS.
declare module "*.css";
