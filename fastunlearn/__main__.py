from fastunlearn.cli.app import main

raise SystemExit(main())
