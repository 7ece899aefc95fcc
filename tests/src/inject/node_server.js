// Node.js as most apps listen: http.createServer().listen(port), no
// reusePort (Node 20 has none): the IPv6 wildcard, dual-stack. Graceful
// stop on SIGTERM: server.close() (stop accepting, finish what was
// accepted). Answers gen=N pid=P.
const http = require("http");
const generation = process.env.RELOADER_GENERATION || "0";
const server = http.createServer((req, res) => {
  res.writeHead(200, { "Content-Type": "text/plain" });
  res.end(`gen=${generation} pid=${process.pid}\n`);
});
server.listen(Number(process.argv[2]));
process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
