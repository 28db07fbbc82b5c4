from edgetag.cli import main

main()
