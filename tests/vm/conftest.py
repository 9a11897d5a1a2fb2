"""Host side of the VM suite. The guest tests under guest/ run only inside the VM: they
remount the cgroup2 hierarchy and write its root, which must never happen on a host."""

collect_ignore = ["guest"]
