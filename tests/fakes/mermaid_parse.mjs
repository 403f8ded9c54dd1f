// Parse Mermaid diagrams with mermaid's own parser (the one its renderer uses) under node.
// stdin: a JSON list of diagram texts; stdout: {"maxTextSize": N, "results": [{ok, error}]}.
// Run from the directory holding node_modules/mermaid and node_modules/jsdom (installed by
// the test outside the repository). Mermaid's parser wants a DOM for its sanitizer: jsdom.
import { readFileSync } from "node:fs";
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", { pretendToBeVisual: true });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
Object.defineProperty(globalThis, "navigator", { value: dom.window.navigator, configurable: true });
globalThis.DOMParser = dom.window.DOMParser;

const { default: mermaid } = await import("mermaid");
mermaid.initialize({ startOnLoad: false });
const maxTextSize = mermaid.mermaidAPI.getConfig().maxTextSize;
const results = [];
for (const text of JSON.parse(readFileSync(0, "utf8"))) {
  try {
    await mermaid.parse(text);
    results.push({ ok: true, error: null });
  } catch (error) {
    results.push({ ok: false, error: String(error?.message ?? error).slice(0, 500) });
  }
}
console.log(JSON.stringify({ maxTextSize, results }));
