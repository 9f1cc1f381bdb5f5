# Answers runc's version request in CRIU's stead (worker/oci/criu-runc.ts says when it runs).
#
# Before every checkpoint and restore runc asks `criu swrk FD` for CRIU's version: a whole CRIU
# start-up (~50 ms on a loaded 2-core host, measured) for an answer that only changes with the
# binary. Here that one request is answered with CRIU's own reply, recorded from the same binary
# when the worker started (--pico-record). Any other request is CRIU's: it is only peeked at
# (MSG_PEEK), so CRIU reads it whole, on the same socket.
#
#   criu-runc.pl CRIU ANSWER swrk FD        a VERSION request is answered here; else exec CRIU swrk FD
#   criu-runc.pl CRIU ANSWER --pico-record  ask CRIU for its version, write the reply to ANSWER
#
# No modules on the swrk path (loading POSIX and Socket costs more than the rest of the run);
# the constants below are Linux's.
use strict;

my ($CRIU, $ANSWER, @args) = @ARGV;
my ($MSG_PEEK, $F_GETFD, $F_SETFD, $FD_CLOEXEC) = (2, 1, 2, 1);
# criu_req { type: VERSION } as runc sends it, and the start of a successful reply to it
my $VERSION_REQUEST = "\x08\x0a";
my $VERSION_REPLY = qr/\A\x08\x0a\x10\x01/;

if (@args == 1 && $args[0] eq '--pico-record') {
  require POSIX;
  require Socket;
  socketpair(my $ours, my $theirs, Socket::AF_UNIX(), Socket::SOCK_SEQPACKET(), 0) or die "criu-runc: socketpair: $!\n";
  my $pid = fork() // die "criu-runc: fork: $!\n";
  if ($pid == 0) {
    close $ours;
    defined POSIX::dup2(fileno($theirs), 3) or POSIX::_exit(127);
    open(my $fd3, '+<&=', 3) or POSIX::_exit(127);
    fcntl($fd3, $F_SETFD, 0); # dup2 onto itself would keep close-on-exec
    exec { $CRIU } $CRIU, 'swrk', '3' or POSIX::_exit(127);
  }
  close $theirs;
  defined send($ours, $VERSION_REQUEST, 0) or die "criu-runc: send: $!\n";
  defined recv($ours, my $reply, 65536, 0) or die "criu-runc: recv: $!\n";
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

if (@args == 2 && $args[0] eq 'swrk' && $args[1] =~ /\A[0-9]+\z/ && open(my $sock, '+<&=', $args[1])) {
  my $request = '';
  if (defined recv($sock, $request, 64, $MSG_PEEK) && $request eq $VERSION_REQUEST && open(my $in, '<:raw', $ANSWER)) {
    my $reply = do { local $/; <$in> };
    if (defined $reply && $reply =~ $VERSION_REPLY) {
      recv($sock, $request, 64, 0); # taken: CRIU will not see it
      defined send($sock, $reply, 0) or die "criu-runc: send: $!\n";
      exit 0;
    }
  }
  # CRIU talks on this descriptor: it must survive the exec (perl marks descriptors > 2 close-on-exec).
  fcntl($sock, $F_SETFD, fcntl($sock, $F_GETFD, 0) & ~$FD_CLOEXEC);
}
exec { $CRIU } $CRIU, @args or die "criu-runc: cannot run $CRIU: $!\n";
