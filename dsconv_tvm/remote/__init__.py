"""Boards over TVM's RPC tracker: :mod:`.tracker` (the protocol, with timeouts), :mod:`.bench`
(latency here or on a board, in a supervised child process), :mod:`.services` (the tracker and
board-server services), :mod:`.processes` (process trees and signals)."""
