//! Unicast repair between peers (NEED/HAVE over TCP); see the peer-repair issue.
