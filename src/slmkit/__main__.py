from slmkit.cli import main

raise SystemExit(main())
