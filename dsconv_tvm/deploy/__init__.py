"""Deploying a compiled model without the compiler: :mod:`.runtime` (the TVM runtime libraries and
headers per architecture, for C++ programs) and :mod:`.bundle` (a folder to copy to the board)."""
