from tinygemma.cli import main

raise SystemExit(main())
