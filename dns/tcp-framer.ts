/**
 * Splits a TCP byte stream into DNS messages, each preceded by its 2-byte length (RFC 7766
 * §8). Whole messages inside a chunk are handed out as zero-copy views of it; a message split
 * across chunks is assembled in a buffer of exactly its announced length, so a peer dribbling
 * one byte at a time costs one copy per byte, never a re-concatenation. Memory per connection
 * is bounded by the largest message, 64 KiB.
 */
export class TcpFramer {
  /** first length octet when only one has arrived */
  private lengthHigh = -1;
  /** the message being assembled, and how much of it has arrived */
  private partial: Buffer | undefined;
  private filled = 0;

  /** `onMessage` returns false to stop: the rest of the stream is ignored. */
  constructor(private readonly onMessage: (msg: Buffer) => boolean) {}

  /** Feeds one chunk; false once onMessage has asked to stop. */
  push(chunk: Buffer): boolean {
    const n = chunk.length;
    let p = 0;
    if (this.lengthHigh >= 0 && n > 0) {
      const len = (this.lengthHigh << 8) | chunk[0]!;
      this.lengthHigh = -1;
      p = 1;
      this.partial = Buffer.allocUnsafe(len);
      this.filled = 0;
    }
    if (this.partial !== undefined) {
      const take = Math.min(this.partial.length - this.filled, n - p);
      chunk.copy(this.partial, this.filled, p, p + take);
      this.filled += take;
      p += take;
      if (this.filled < this.partial.length) return true;
      const msg = this.partial;
      this.partial = undefined;
      if (!this.onMessage(msg)) return false;
    }
    while (p < n) {
      if (n - p === 1) {
        this.lengthHigh = chunk[p]!;
        return true;
      }
      const len = (chunk[p]! << 8) | chunk[p + 1]!;
      p += 2;
      if (n - p < len) {
        this.partial = Buffer.allocUnsafe(len);
        this.filled = n - p;
        chunk.copy(this.partial, 0, p, n);
        return true;
      }
      if (!this.onMessage(chunk.subarray(p, p + len))) return false;
      p += len;
    }
    return true;
  }
}
