from fcnify.cli import main

main()
