// The quick start's raw TCP app: echoes every byte back.
import net from 'node:net';

const port = Number(process.env.PORT ?? 7000);
const server = net.createServer((socket) => {
  socket.on('error', () => socket.destroy());
  socket.pipe(socket);
});
server.listen(port, process.env.HOST ?? '127.0.0.1'); // the worker says where to listen
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
