from m3i.cli import main
import sys
sys.exit(main())
