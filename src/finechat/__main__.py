from finechat.cli import main

raise SystemExit(main())
