import { request } from 'undici';
import type { Config } from '../shared/config.js';

/** Talks to a running system's admin API, found through the same config file. */
export class AdminClient {
  private readonly base: string;
  constructor(private readonly cfg: Readonly<Config>) {
    const { host, port } = cfg.gateway.admin.listen;
    const h = host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '::1' : host;
    this.base = `http://${h.includes(':') ? `[${h}]` : h}:${port}`;
  }

  async call<T>(method: 'GET' | 'POST', path: string): Promise<T> {
    return JSON.parse(await this.text(method, path)) as T;
  }

  /** The response body as text; rejects with the API's error code and message on >= 400. */
  async text(method: 'GET' | 'POST', path: string): Promise<string> {
    let res;
    try {
      res = await request(`${this.base}${path}`, {
        method,
        headers: { authorization: `Bearer ${this.cfg.gateway.admin.token}` },
      });
    } catch (err) {
      throw new Error(`cannot reach the admin API at ${this.base} (is \`picocenter up\` running?): ${(err as Error).message}`);
    }
    const text = await res.body.text();
    if (res.statusCode >= 400) {
      let code = 'PICO_ERR_ADMIN';
      let message = text;
      try {
        const parsed = JSON.parse(text) as { error?: { code: string; message: string } };
        if (parsed.error) ({ code, message } = parsed.error);
      } catch {
        // not JSON: keep the raw text
      }
      throw Object.assign(new Error(`${code}: ${message}`), { status: res.statusCode, code });
    }
    return text;
  }
}

