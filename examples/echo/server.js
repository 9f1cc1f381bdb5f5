// The quick start's raw TCP app: echoes every byte back.
import net from 'node:net';

const port = Number(process.env.PORT ?? 7000);
const server = net.createServer((socket) => {
  socket.on('error', () => socket.destroy());
  socket.pipe(socket);
});
server.listen(port, '127.0.0.1');
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
