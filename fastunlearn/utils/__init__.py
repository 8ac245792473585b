"""What every layer may use, importing nothing else of fastunlearn: argument checks (``validate``), atomic files
(``atomic``), errors that name a missing extra (``optional``), torchrun process groups (``distributed``), and the
old import paths of moved modules (``moved``)."""
