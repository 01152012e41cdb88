from sparseroute.cli import main

raise SystemExit(main())
