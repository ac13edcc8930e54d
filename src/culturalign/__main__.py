from culturalign.cli import main

main()
