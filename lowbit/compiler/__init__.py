"""The compiler: the pipeline that runs frontend -> passes -> rules -> lowering -> artifact (pipeline.py), the
output path checks (output_path.py) and report.md (report.py)."""
