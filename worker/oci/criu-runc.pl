# The criu runc runs (`runc --criu`), in front of the real one (worker/oci/criu-runc.ts writes
# the executable: a first line naming $CRIU and $ANSWER, then this file).
#
# Before every checkpoint and restore runc asks `criu swrk FD` for CRIU's version: a whole CRIU
# start-up (~50 ms on a loaded 2-core host, measured) for an answer that only changes with the
# binary. Here that one request is answered with CRIU's own reply, recorded from the same binary
# when the worker started (--pico-record). Every other run, and every other request, is CRIU's:
# the request is only peeked at (MSG_PEEK), so CRIU reads it whole, on the same socket.
#
#   criu-runc swrk FD        (runc) a VERSION request is answered here; anything else: exec CRIU
#   criu-runc --pico-record  ask CRIU for its version, write the reply to $ANSWER (atomically)
#   criu-runc ARGS...        exec CRIU ARGS...
use strict;
use warnings;
use Fcntl qw(F_GETFD F_SETFD FD_CLOEXEC);
use POSIX qw(dup2 _exit);
use Socket qw(AF_UNIX SOCK_SEQPACKET MSG_PEEK);

our ($CRIU, $ANSWER);

# criu_req { type: VERSION } as runc (go-criu) sends it
my $VERSION_REQUEST = "\x08\x0a";
# criu_resp { type: VERSION, success: true, ... }
my $VERSION_REPLY = qr/\A\x08\x0a\x10\x01/;

sub run_criu { exec { $CRIU } $CRIU, @_ or die "criu-runc: cannot run $CRIU: $!\n" }

if (@ARGV == 1 && $ARGV[0] eq '--pico-record') {
  socketpair(my $ours, my $theirs, AF_UNIX, SOCK_SEQPACKET, 0) or die "criu-runc: socketpair: $!\n";
  my $pid = fork() // die "criu-runc: fork: $!\n";
  if ($pid == 0) {
    close $ours;
    dup2(fileno($theirs), 3) // _exit(127);
    open(my $fd3, '+<&=', 3) or _exit(127);
    fcntl($fd3, F_SETFD, 0); # dup2 onto itself would keep close-on-exec
    exec { $CRIU } $CRIU, 'swrk', '3' or _exit(127);
  }
  close $theirs;
  send($ours, $VERSION_REQUEST, 0) // die "criu-runc: send: $!\n";
  my $reply = '';
  defined recv($ours, $reply, 65536, 0) or die "criu-runc: recv: $!\n";
  close $ours;
  waitpid($pid, 0);
  die "criu-runc: $CRIU did not answer its version\n" unless $reply =~ $VERSION_REPLY;
  my $tmp = "$ANSWER.tmp$$";
  open(my $out, '>:raw', $tmp) or die "criu-runc: $tmp: $!\n";
  print $out $reply or die "criu-runc: $tmp: $!\n";
  close $out or die "criu-runc: $tmp: $!\n";
  rename($tmp, $ANSWER) or die "criu-runc: $ANSWER: $!\n";
  exit 0;
}

if (@ARGV == 2 && $ARGV[0] eq 'swrk' && $ARGV[1] =~ /\A[0-9]+\z/ && open(my $sock, '+<&=', $ARGV[1])) {
  my $request = '';
  if (defined recv($sock, $request, 64, MSG_PEEK) && $request eq $VERSION_REQUEST && open(my $in, '<:raw', $ANSWER)) {
    my $reply = do { local $/; <$in> };
    if (defined $reply && $reply =~ $VERSION_REPLY) {
      recv($sock, $request, 64, 0); # taken: CRIU will not see it
      defined send($sock, $reply, 0) or die "criu-runc: send: $!\n";
      exit 0;
    }
  }
  # CRIU talks on this descriptor: it must survive the exec (perl marks descriptors > 2 close-on-exec).
  fcntl($sock, F_SETFD, fcntl($sock, F_GETFD, 0) & ~FD_CLOEXEC);
}
run_criu(@ARGV);
