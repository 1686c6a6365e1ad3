"""`cogpipe ui`: a Gradio page over what the command line does (the `ui` extra: pip install -e ".[ui]").

    safety.py     the bind/auth rule and the folders typed paths may name
    runs.py       the runs under outputs/: state, metrics, checkpoints, validation videos (no Gradio)
    launcher.py   the one-at-a-time queue of `accelerate launch train.py ...` and `cogpipe export` subprocesses
    generate.py   the Generate tab's work: infer.py's own parser, checks and sampling, a cached pipeline
    app.py        the page: Generate, Runs and Train tabs (the only module that imports gradio)
    cli.py        the subcommand: host, port, outputs folder, auth

Everything but app.py is plain Python, tested without a browser (tests/test_ui.py); tests/test_ui_browser.py drives
the page in headless Chromium.
"""
