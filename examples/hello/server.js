// The quick start's HTTP app: answers every request with a greeting and how long it has run.
import http from 'node:http';

const port = Number(process.env.PORT ?? 9001);
const started = Date.now();
let requests = 0;

const server = http.createServer((req, res) => {
  requests++;
  const body = `hello from ${process.env.APP_NAME ?? 'hello'} (pid ${process.pid}, up ${Date.now() - started} ms, request ${requests})\n`;
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
const host = process.env.HOST ?? '127.0.0.1'; // the worker says where: loopback, or all of a container's addresses
server.listen(port, host, () => console.log(`hello listening on ${host}:${port}`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
