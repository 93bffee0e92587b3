// Parses an AsyncAPI document with the AsyncAPI project's own parser and prints its diagnostics as JSON:
// [{severity, message, path}], severity 0 = error. Used by tests/test_asyncapi.py.
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { Parser, fromFile } from "@asyncapi/parser";

const path = resolve(process.argv[2]);
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, path).parse();
const found = diagnostics.map(d => ({ severity: d.severity, message: d.message, path: d.path.join("/") }));
const summary = document ? {
  channels: document.channels().all().map(c => c.address()),
  messages: document.messages().all().map(m => m.name()),
  operations: document.operations().all().map(o => ({ id: o.id(), action: o.action(),
    channel: o.channels().all().map(c => c.address())[0] })),
} : null;
console.log(JSON.stringify({ diagnostics: found, document: summary }));
