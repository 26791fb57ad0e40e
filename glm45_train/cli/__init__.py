"""Command line: one small module per command, each parsing argv and calling one library function."""
