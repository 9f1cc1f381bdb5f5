/** One line of /proc/PID/mountinfo. */
export interface MountEntry {
  /** the directory of its filesystem this mount shows ('/' for all of it) */
  root: string;
  mountpoint: string;
  fstype: string;
  /** the superblock's options (field 11), e.g. rw,nsdelegate */
  superOptions: string[];
}

/** The mounts of a mountinfo text, in its order (a later mount on the same point is on top). */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
    const [left, right] = line.split(' - ');
    if (!left || !right) continue;
    const l = left.split(' ');
    const [fstype, , superOptions] = right.split(' ');
    if (l.length < 6 || !fstype) continue;
    out.push({ root: unescape(l[3]!), mountpoint: unescape(l[4]!), fstype, superOptions: (superOptions ?? '').split(',').filter(Boolean) });
  }
  return out;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}
