# A stand-in that hides the installed decord: put this folder first on PYTHONPATH (and COGPIPE_VIDEO_BACKEND=pyav)
# to run tests as on a platform without decord (Linux aarch64, macOS arm64), subprocesses included (docs/video.md).
raise ImportError("decord is hidden for this run (tests/no_decord first on PYTHONPATH): cogpipe must read video "
                  "with PyAV")
