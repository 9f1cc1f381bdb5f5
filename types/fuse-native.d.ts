/*
 * The part of fuse-native 2.2.6 (CommonJS) that pagestore/fuse-server.ts uses. Result codes are
 * 0 or a negative errno (`Fuse.ENOENT`…); a read's result is the number of bytes it wrote.
 */
declare module 'fuse-native' {
  namespace Fuse {
    /** fs.Stats-like attributes; times as Date or ms since the epoch */
    interface Stat {
      mode: number;
      size: number;
      uid?: number;
      gid?: number;
      nlink?: number;
      blksize?: number;
      blocks?: number;
      mtime?: Date | number;
      atime?: Date | number;
      ctime?: Date | number;
    }
    interface StatFs {
      bsize: number;
      frsize: number;
      blocks: number;
      bfree: number;
      bavail: number;
      files: number;
      ffree: number;
      favail: number;
      fsid: number;
      flag: number;
      namemax: number;
    }
    type Done = (code: number) => void;
    interface Operations {
      init?(cb: Done): void;
      getattr?(path: string, cb: (code: number, stat?: Stat) => void): void;
      readdir?(path: string, cb: (code: number, names?: string[]) => void): void;
      open?(path: string, flags: number, cb: (code: number, fd?: number) => void): void;
      opendir?(path: string, flags: number, cb: (code: number, fd?: number) => void): void;
      /** `buffer` is libfuse's memory, valid only until `cb`; `cb(bytes)` or `cb(-errno)` */
      read?(path: string, fd: number, buffer: Buffer, length: number, position: number, cb: (result: number) => void): void;
      write?(path: string, fd: number, buffer: Buffer, length: number, position: number, cb: (result: number) => void): void;
      release?(path: string, fd: number, cb: Done): void;
      releasedir?(path: string, fd: number, cb: Done): void;
      statfs?(path: string, cb: (code: number, statfs?: StatFs) => void): void;
      access?(path: string, mode: number, cb: Done): void;
      create?(path: string, mode: number, cb: (code: number, fd?: number) => void): void;
      truncate?(path: string, size: number, cb: Done): void;
      ftruncate?(path: string, fd: number, size: number, cb: Done): void;
      unlink?(path: string, cb: Done): void;
      rename?(src: string, dest: string, cb: Done): void;
      link?(src: string, dest: string, cb: Done): void;
      symlink?(src: string, dest: string, cb: Done): void;
      mkdir?(path: string, mode: number, cb: Done): void;
      rmdir?(path: string, cb: Done): void;
      mknod?(path: string, mode: number, dev: number, cb: Done): void;
      chmod?(path: string, mode: number, cb: Done): void;
      chown?(path: string, uid: number, gid: number, cb: Done): void;
      utimens?(path: string, atime: number, mtime: number, cb: Done): void;
      setxattr?(path: string, name: string, value: Buffer, position: number, flags: number, cb: Done): void;
      removexattr?(path: string, name: string, cb: Done): void;
    }
    interface Options {
      /** per-op answer deadline in ms (default 15000; answers ETIMEDOUT); false: none */
      timeout?: number | false;
      mkdir?: boolean;
      force?: boolean;
      debug?: boolean;
      autoUnmount?: boolean;
      allowOther?: boolean;
      kernelCache?: boolean;
      autoCache?: boolean;
      maxRead?: number;
      fsname?: string;
      subtype?: string;
      /** in seconds */
      entryTimeout?: number;
      /** in seconds */
      attrTimeout?: number;
    }
  }
  class Fuse {
    constructor(mnt: string, ops: Fuse.Operations, opts?: Fuse.Options);
    readonly mnt: string;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    static readonly EPERM: number;
    static readonly ENOENT: number;
    static readonly EIO: number;
    static readonly EBADF: number;
    static readonly EACCES: number;
    static readonly EISDIR: number;
    static readonly ENOTDIR: number;
    static readonly EINVAL: number;
    static readonly EROFS: number;
    static readonly ENOSYS: number;
    static readonly ENOTCONN: number;
  }
  export = Fuse;
}
