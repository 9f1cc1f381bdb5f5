import net from 'node:net';

/**
 * A TCP port that was free a moment ago, for apps whose port is fixed in their config (the
 * process runtime shares the host's ports). Servers of our own listen on port 0 instead.
 */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}
