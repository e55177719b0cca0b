"""The daemon's main process: builds segments, forks workers, keeps them alive."""
