"""The graph IR: the traced Graph with its quantizable sites, and the streaming calibration interpreter."""
