from kins_tunnel.cli import main

raise SystemExit(main())
