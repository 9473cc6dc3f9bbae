from herd.cli import main

raise SystemExit(main())
