"""The host side: domain processes, their control sockets, the state dir."""
