from invalgw.cli import main

raise SystemExit(main())
