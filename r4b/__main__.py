from r4b.cli import main

raise SystemExit(main())
