from nacd.cli import main

raise SystemExit(main())
