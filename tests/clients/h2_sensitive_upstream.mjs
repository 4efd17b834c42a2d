// An HTTP/2 upstream whose HPACK decoder is Node's own (nghttp2), independent of the `hpack`
// library keyhole encodes with. Each answer names the fields that arrived as never-indexed
// literals (RFC 7541 §7.1.3): Node lists them in headers[http2.sensitiveHeaders].
// Usage: node h2_sensitive_upstream.mjs CERT KEY — prints the port, serves until killed.
import fs from "node:fs";
import http2 from "node:http2";

const [cert, key] = process.argv.slice(2);
const server = http2.createSecureServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
server.on("stream", (stream, headers) => {
  const answer = JSON.stringify({
    path: headers[":path"],
    sensitive: (headers[http2.sensitiveHeaders] || []).map((name) => name.toLowerCase()).sort(),
    names: Object.keys(headers).sort(),
  });
  stream.respond({ ":status": 200, "content-type": "application/json" });
  stream.end(answer);
});
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
