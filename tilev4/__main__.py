from tilev4.cli import main

raise SystemExit(main())
